from runfmt.cli import main

main()
