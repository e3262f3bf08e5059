"""Communication: topology, wire packing (pure) and collectives. The communicator is always passed in."""
