"""Research code, apart from the core: the BatchNorm study (`bn_study`), the studies of the lecture notes'
claims (`notes`) and the benchmarks (`bench`). They import the core (`cnnjax.train`, `nn`, `models`, ...)
and the core never imports them; `scripts/` holds their thin entry points."""
