"""The built-in evaluation suites, one module each (registered in `finrecipe.eval.suite.BUILTIN`)."""
