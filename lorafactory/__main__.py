"""`python -m lorafactory variant=dora task=glue/sst2`: see lorafactory/cli.py."""

from lorafactory.cli import main

if __name__ == "__main__":
    main()
