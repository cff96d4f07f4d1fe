"""Inside the network: filter visualization, filter statistics, feature inversion and concepts."""
