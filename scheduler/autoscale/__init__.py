"""Carrying out the autoscaler's policy (`scheduler.policy.autoscaler`): the
controller that drains and removes or adds workers, and the provisioners that start
and stop them (local processes, Ray actors, a Kubernetes workload)."""
