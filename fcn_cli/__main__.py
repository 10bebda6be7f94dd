from fcn_cli.cli import main

main()
