"""Fuzzers for streampickle's decoding side: a grammar of protocol-5 pickles, the targets and
their oracle, and a runner (``python -m fuzz.run``). See fuzz/README.md."""
