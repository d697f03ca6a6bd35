"""The teacher stage: `python -m data_gen experiment=NAME [data.repair=true] [key=value ...]`."""
