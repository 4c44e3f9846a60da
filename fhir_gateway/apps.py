from django.apps import AppConfig


class FhirGatewayConfig(AppConfig):
    name = "fhir_gateway"
