"""The PyTorch side of jaxattr: torch twins of every model, conversion of torch weights and
models, layer-by-layer verification, and the PyTorch reference runs behind `jaxattr crosscheck`.

Needs the `jaxattr[torch]` extra (the references also need `jaxattr[dev]`); `import jaxattr`
never imports this package."""
