from soft_prompting.report.build import main

main()
