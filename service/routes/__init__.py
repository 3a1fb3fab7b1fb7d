"""The gateway's routes, one ``APIRouter`` per resource: ``jobs`` (uploads, status, results,
cancel) and ``ops`` (health, metrics, the web page). ``service.app.create_app`` includes them."""
