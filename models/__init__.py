"""The learning side, in pipeline order: data -> features -> network -> training -> methods.

Each subpackage imports only from those before it (and `models.devices`), so serving, which
needs features and the network, never imports training or the baselines.
"""
