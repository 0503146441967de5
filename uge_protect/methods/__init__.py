"""Protection methods: the contract every method meets, its registry, artifacts, the budget, and one subpackage per method."""
