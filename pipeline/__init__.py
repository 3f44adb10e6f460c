"""atss-ray pipeline: data, training, evaluation, tracking and sweeps around the `detector` package."""
