"""The SePT loop (:mod:`~sept_megatron.loop.driver`) and the parts it reads as: the schedule
and modes, one round's data, the engine fleet, checkpoints, validation and set-up."""
