"""`python -m streamcl.deploy.cli` (what torchrun launches) runs the `streamcl` command."""

from streamcl.deploy.cli.main import main

main()
