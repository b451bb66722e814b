"""The course's figures: ``lessons`` draws what a notebook computes on the spot (routings,
sorts, errors, gradients), ``results`` draws the measured tables, with the card in the title."""
