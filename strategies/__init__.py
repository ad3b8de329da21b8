"""Server-side aggregation strategies (Flower Message-API strategies) and the ServerApp."""
