"""Development tooling of pd-operator: not part of the product.

What only builds, generates, tests or develops the product lives here, apart from the product
packages (`pd_operator`, `pd_runtime`), which never import it (.importlinter checks that):

* `devcluster`   - the local Kubernetes control plane (`pdctl dev cluster ...`)
* `generate`     - every generated file of the repository (`make generate`, `make check-generated`)
* `chart_values` - the Helm chart's values table and the chart files derived from it
* `docs_gen`     - docs/compatibility.md from the rule data
* `certs`        - development certificates (a CA and a serving certificate, via openssl)
* `cli`          - `pdctl dev ...`, which pdctl loads when this package is installed
"""
