"""One module per `localglm` subcommand, each with add_arguments(parser) and main(args)."""
