"""The runner's bookkeeping: run directories and their locks (:mod:`.directory`,
:mod:`.locks`), fingerprints (:mod:`.fingerprints`), running one stage with the stage store
and resume (:mod:`.store`), measuring a finished run (:mod:`.measure`). The recipe that
orders the stages is :mod:`kdistill.experiment`."""
