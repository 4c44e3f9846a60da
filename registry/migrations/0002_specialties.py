from django.db import migrations

from registry.specialties import PRACTICE_SETTING_SPECIALTIES

SNOMED = "http://snomed.info/sct"


def load(apps, schema_editor):
    Specialty = apps.get_model("registry", "Specialty")
    for code, display in PRACTICE_SETTING_SPECIALTIES:
        Specialty.objects.update_or_create(system=SNOMED, code=code, defaults={"display": display})


class Migration(migrations.Migration):
    dependencies = [("registry", "0001_initial")]
    operations = [migrations.RunPython(load, migrations.RunPython.noop)]
