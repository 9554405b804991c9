"""Making a swap usable on a pretrained model: training-free calibration (``calibrate``) and saving/loading a
swap beside the model (``saving``)."""
