"""The colocated engine: sequences, scheduling policies, the model runner and the step loop."""
