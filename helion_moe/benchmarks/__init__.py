"""The GPU studies behind the notebooks' tables and figures: timing, the shapes and models
timed, one harness per study, and the tables read from its results. They sit on top of the
library: nothing in the library imports them."""
