"""One endpoint over N `tidal serve` replicas: routing, fan-out control, request migration."""
