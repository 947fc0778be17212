"""Invariant checks over the whole system (issue 4): what must hold once faults stop and work is done."""
