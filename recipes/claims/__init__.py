"""The claims study: the survey's claims (``configs/claims.yaml``) measured on the embedded tasks.

- :mod:`~recipes.claims.registry`: the pre-registered experiments, read and checked;
- :mod:`~recipes.claims.arms`: each arm as a sweep of the comparison engine (:mod:`recipes.sweep`).
"""
