"""Run many ``python -m lodo.run`` command lines in one process: a JSON list of argument lists on stdin,
a JSON list of {code, stdout, stderr} on stdout, then whether TensorFlow was ever imported.

Refusals that happen before TensorFlow starts cost a second each as processes of their own; here
they share one interpreter, and the last record proves that none of them needed TensorFlow.
"""

import contextlib
import io
import json
import os
import sys
import traceback

from lodo.experiment import cli

if __name__ == "__main__":
    results = []
    for args in json.loads(sys.stdin.read()):
        sys.argv = ["lodo.run", *args]
        os.environ.pop("HYDRA_FULL_ERROR", None)  # as in a fresh process (cli() sets it for Hydra)
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.cli()
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:  # reported as a traceback, which the test refuses
                traceback.print_exc(file=err)
                code = "exception"
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    print(json.dumps({"results": results, "tensorflow_imported": "tensorflow" in sys.modules}))
