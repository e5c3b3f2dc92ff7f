"""The logged model as a folder of data: its format and compatibility rule, the upgrade of
what earlier versions wrote, the `torch.export` program (`format`), and logging, resolving
and reading such a folder through an MLflow client (`store`)."""
