from fusionops.cli import main

main()
