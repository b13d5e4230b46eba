"""The sharing path: the request worker, its outbox of deliveries and the MQTT transport."""
