"""Run at interpreter start by ``streaming_lm.pth``: register ``streaming_hf`` once lm-eval loads.

Costs only an import-system hook at start-up; nothing happens unless
``lm_eval.api.registry`` is imported (and lm-eval is installed).
"""

import sys

_WATCHED = "lm_eval.api.registry"


class _RegisterAfterImport:
    # A plain meta-path finder: importing importlib.abc would cost more than all the rest.
    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        sys.meta_path.remove(self)  # one shot: find the real spec without us
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                from streaming_lm.registration import register

                register()
            except Exception as error:  # never break lm-eval's own import
                print(f"streaming_lm: could not register streaming_hf: {error!r}", file=sys.stderr)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if _WATCHED in sys.modules:
        from streaming_lm.registration import register

        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
