"""The course's figures: ``lessons`` draws what a notebook computes on the spot (routings,
sorts, errors, gradients); ``results`` (the matmul's, and the style they all share), ``layer``
(the layer's, its backward's, FP8's and expert parallelism's) and ``serving`` draw the measured
tables, with the card in the title."""
