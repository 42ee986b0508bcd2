"""`rakt download`: a transfer manifest's URLs -> WebDataset shards (img2dataset), behind an address guard (guard.py)
and a filtering proxy (proxy.py); report.py reads what img2dataset wrote."""
