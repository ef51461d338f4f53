import os

from hypothesis import HealthCheck, settings

# A CI profile with a bounded example count keeps the whole suite within minutes on 2 cores;
# NUMSTAB_HYPOTHESIS_PROFILE=thorough runs ten times more examples.
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("NUMSTAB_HYPOTHESIS_PROFILE", "ci"))
