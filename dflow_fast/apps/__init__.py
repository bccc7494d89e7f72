"""Applications built on the library: the ``dflow-fast`` command line (cli.py), the Fashion-MNIST
demo (demo.py), the self-contained digits demo (demo_digits.py) and their pictures (plots.py).
The top layer: may import anything in dflow_fast; nothing imports it but the package root."""
