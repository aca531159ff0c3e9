"""Test helpers: tiny datasets in the real formats (:mod:`helpers.fake_datasets`)."""
