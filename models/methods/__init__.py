"""The methods `cmh evaluate` compares: the baselines and the loop that fits and scores them."""
