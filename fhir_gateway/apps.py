from django.apps import AppConfig


class FhirGatewayConfig(AppConfig):
    name = "fhir_gateway"
    verbose_name = "FHIR gateway"

    def ready(self) -> None:
        # The handler registry is what /fhir routes to and what /fhir/metadata declares.
        from fhir_gateway import (
            binary,
            measures,
            referral_resources,
            registry_resources,
            subscriptions,
        )

        registry_resources.register_all()
        referral_resources.register_all()
        binary.register_all()
        measures.register_all()
        subscriptions.register_all()
