"""The RL policy: an RLlib PPO-trained, action-masking RLModule (docs/agent.md, "The RL policy").

    module.py        MaskedActorCritic, the RLModule (masked logits, value tower)
    distribution.py  training scenarios: the shipped suite with profiles and lambda varied
    prior.py         optional behaviour-cloning start from a heuristic teacher
    train.py         TrainConfig and train(): PPO on raysys/ClusterEnv-v0, checkpoint, evaluation
    policy.py        RLPolicy, registered as "rl" (loads the RLModule alone)

Importing this package is cheap; torch and RLlib load only when a module is built or loaded.
"""
