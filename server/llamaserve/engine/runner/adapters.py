"""LoRA adapters as rank 0 tracks them: which are registered by name, and which sit in the model's slots (least
recently used first), so that every adapter of a step is resident before the step runs. Loading a slot and
telling the layers each token's slot happen on every rank (ModelRunner), from what rank 0 placed."""

from collections import OrderedDict

from llamaserve.engine.runner.inputs import StepInputs
from llamaserve.engine.scheduler import ScheduledRequest
from llamaserve.model.lora import AdapterError, LoraManager


class AdapterSlots:
    def __init__(self, lora: LoraManager | None):
        self.lora = lora
        self.adapters: dict[str, str] = {}  # registered adapter name -> folder
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter -> slot, least recently used first

    def register(self, name: str, path: str) -> None:
        """Check the adapter, then serve it by name. Raises AdapterError (a ValueError) with the reason when it
        cannot be served."""
        if self.lora is None:
            raise AdapterError("LoRA adapters are off: start the server with --enable-lora or --lora-modules")
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        self.lora.check(self.lora.adapter(path))
        self.adapters[name] = path

    def unregister(self, name: str) -> None:
        """Requests still running on it fail at their next step; its slot is free for another."""
        path = self.adapters.pop(name, None)
        if path is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        self._resident.pop(name, None)
        if path not in self.adapters.values():
            self.lora.forget(path)

    def check(self, name: str | None) -> None:
        """Raises AdapterError when a request's adapter has been unloaded since it arrived."""
        if name is not None and name not in self.adapters:
            raise AdapterError(f"the LoRA adapter {name!r} was unloaded")

    def place(self, scheduled: list[ScheduledRequest], inputs: StepInputs) -> None:
        """A slot for every adapter of the step (the scheduler admits at most max_loras of them), loading the
        ones not resident over the least recently used others: fills `inputs.lora_slots` and `lora_loads`."""
        names = {item.request.lora for item in scheduled} - {None}
        if not names:
            return
        for name in names:
            if name in self._resident:
                self._resident.move_to_end(name)
                continue
            free = set(range(self.lora.num_slots)) - set(self._resident.values())
            if free:
                slot = min(free)
            else:
                victim = next(n for n in self._resident if n not in names)
                slot = self._resident.pop(victim)
            self._resident[name] = slot
            inputs.lora_loads.append((slot, self.adapters[name]))
        inputs.lora_slots = [-1 if item.request.lora is None else self._resident[item.request.lora]
                             for item in scheduled]

    def forget_slots(self) -> None:
        """After a failed step: trust no slot it may have been loading (each is loaded again when next used)."""
        self._resident.clear()
