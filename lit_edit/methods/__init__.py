"""Editing methods, one LightningModule each; importing a class here registers it for the CLI."""

from lit_edit.methods.alphaedit import AlphaEditEditor
from lit_edit.methods.base import EditorModule
from lit_edit.methods.ece import ECEEditor
from lit_edit.methods.ft import FTEditor
from lit_edit.methods.ike import IKEEditor
from lit_edit.methods.lte import LTEEditor
from lit_edit.methods.memit import MEMITEditor
from lit_edit.methods.mend import MENDEditor
from lit_edit.methods.noedit import NoEdit
from lit_edit.methods.rome import ROMEEditor
from lit_edit.methods.serac import SERACEditor
from lit_edit.methods.wise import WISEEditor

__all__ = [
    "AlphaEditEditor", "ECEEditor", "EditorModule", "FTEditor", "IKEEditor", "LTEEditor",
    "MEMITEditor", "MENDEditor", "NoEdit", "ROMEEditor", "SERACEditor", "WISEEditor",
]
