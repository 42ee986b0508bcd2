"""`rakt adapt`: the teacher fitted to the target task (adapt.py), its adapt modes (modes.py), the adapted model
(model.py), the fitting loops (fit.py) and the labelled data they read (data.py)."""
