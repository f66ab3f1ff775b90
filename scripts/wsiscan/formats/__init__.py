"""The files the stages hand to each other: one module per format, each with its layout, its one
writer and its one validating reader.

========================  =====================  ==================================================
file                      module                 written by -> read by
========================  =====================  ==================================================
``tissue.png``            :mod:`.tissue_mask`    tissue_mask -> roi_grid, train_patches
``rois.h5``               :mod:`.rois`           roi_grid -> infer, mine_negatives
``tiles.h5``              :mod:`.tiles`          infer -> stitch (and mine_negatives, internally)
``probmap.h5``            :mod:`.probmap`        stitch -> detect, evaluate
``lesions.csv``,          :mod:`.lesions`        detect -> evaluate
``score.json``
``patches.h5``,           :mod:`.patches`        train_patches, mine_negatives -> train_round,
``hard_negatives.h5``                            mine_negatives
``model.pt``              :mod:`.checkpoint`     init_model, train_round -> infer, train_round,
                                                 mine_negatives
========================  =====================  ==================================================

Outputs are written atomically (:mod:`wsiscan.fileio`). Readers raise
:class:`wsiscan.errors.SlideError` naming the slide, the file and the cause; an HDF5 intermediate
of the workflow's own that is unreadable is moved aside (:func:`wsiscan.faults.quarantine`).
"""
