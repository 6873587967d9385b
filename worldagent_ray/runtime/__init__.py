"""The thin Ray shell: Serve deployments and actors that place and connect the pure cores.

Only this package (and ``jobs/``) imports Ray; everything it wraps is testable without it.
"""
