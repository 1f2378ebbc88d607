"""Result writers beside the heatmap (see :mod:`histotile.stitch` for ``heatmap.ome.zarr``).

- :mod:`histotile.export.csv`: ``predictions.csv`` (``PredictionsCSVWriter``,
  ``read_predictions_csv``)
- :mod:`histotile.export.qupath`: ``tiles.geojson.gz`` (``GeoJSONTileWriter``, ``merge_classes``,
  ``export_qupath``)
- :mod:`histotile.export.overlay`: ``overlay.png`` (``write_overlay``: class colours, confidence,
  names, scale bar) and ``tissue_mask.png`` (``write_mask_png``)
- :mod:`histotile.export.tissue_picture`: ``tissue.png`` (mask, outline and kept patch grid)
- :mod:`histotile.export.drawing`: what the pictures share (font, outline, scale bar, text panel)
- :mod:`histotile.export.ome_tiff`: pyramidal OME-TIFF of the heatmap (``export_ome_tiff``)

Each writer streams (memory bounded by the batch) into a temporary file renamed when complete
(:mod:`histotile.fileio`).
Submodules are imported on use so that ``import histotile.export`` stays light.
"""
