from soft_prompting.organisms.builder import main

main()
