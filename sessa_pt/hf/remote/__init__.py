"""Files copied into every export directory as they are (they run there, under transformers'
remote-code loader, beside the bundled model code: see ``sessa_pt.hf.bundle``)."""
