"""`rakt curate`: candidates -> a transfer manifest under a budget (curate.py); the filtering rules are a registry
(rules.py) built on the similarity checks of similarity.py."""
