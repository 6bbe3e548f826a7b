"""The single error type of ctref.

Every rule the format imposes that an input breaks (a config key, a tensor's dtype or shape, a
catalog entry) raises :class:`CTRefError`. Its message leads with where the problem is (file,
tensor, key path) and ends with the rule, so one line tells the user what to fix.
"""

from __future__ import annotations


class CTRefError(ValueError):
    """An input that breaks a rule of the compressed-tensors format.

    ``rule`` says what was expected; ``file``, ``tensor`` and ``key`` say where. Inner code that
    does not know the file raises without it, and the reader adds it with :meth:`located`.
    """

    def __init__(
        self,
        rule: str,
        *,
        key: str | None = None,
        file: str | None = None,
        tensor: str | None = None,
    ) -> None:
        self.rule = rule
        self.key = key
        self.file = file
        self.tensor = tensor
        where = [part for part in (file, tensor, key) if part]
        super().__init__(": ".join([*where, rule]))

    def located(self, *, file: str | None = None, module: str | None = None) -> CTRefError:
        """The same error placed in a checkpoint: a file, and the module owning the tensor.

        Format code names tensors locally (``weight_scale``); the reader knows the module
        (``model.layers.0.mlp.down_proj``) and the file, and adds them here.
        """
        tensor = self.tensor
        if module:
            tensor = f"{module}.{tensor}" if tensor else module
        return CTRefError(self.rule, key=self.key, file=self.file or file, tensor=tensor)
