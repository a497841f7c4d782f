"""Why the pure model transfers the drug screen poorly to the held-out patient: does its delta carry the patient shift?

    python experiments/user_files.py --seed S --threads 1 --only drug_doses --work W   # keeps the files and model
    PYTHONPATH=. python experiments/results/attempts/drug_transfer/diagnose.py W/drug_doses

Per drug-dose condition of patient PD: correlations of the pure model's mean delta (pred_pure.h5ad) with the measured
delta (real.h5ad: PD's treated cells against its reference controls), with meanshift (the training patients' own
effects, averaged), with the patient shift (the training patients' mean control minus PD's baseline controls) and
with meanshift + patient shift (what a model that turned PD's cells into an average training patient's treated cell
would predict); then the prediction with its component along the patient shift removed.
"""
import anndata as ad, numpy as np, sys, json
import virtualcell as vc
from virtualcell.sentences import model_expression
d = sys.argv[1]
tr=ad.read_h5ad(f"{d}/train.h5ad"); real=ad.read_h5ad(f"{d}/real.h5ad"); base=ad.read_h5ad(f"{d}/baseline.h5ad"); pp=ad.read_h5ad(f"{d}/pred_pure.h5ad")
m = vc.C2SModel.load(f"{d}/model")
def X(a):
    a = a.copy()
    x,_ = model_expression(a, m.genes); return np.asarray(x.toarray() if hasattr(x,"toarray") else x)
Xtr, Xre, Xb = X(tr), X(real), X(base)
Xp = np.asarray(pp.X.toarray() if hasattr(pp.X,"toarray") else pp.X)
print("genes", len(m.genes.genes), Xp.shape)
lab_tr = (tr.obs.perturbation.astype(str) + "@" + tr.obs.dose.astype(str)).to_numpy()
lab_re = (real.obs.perturbation.astype(str) + "@" + real.obs.dose.astype(str)).to_numpy()
pat = tr.obs.patient.astype(str).to_numpy()
ctrl_tr = tr.obs.perturbation.astype(str).to_numpy()=="control"
ref = Xre[real.obs.perturbation.astype(str).to_numpy()=="control"].mean(0)
bmean = Xb.mean(0)
shift = np.mean([Xtr[ctrl_tr & (pat==p)].mean(0) for p in sorted(set(pat)) if p!="PD"],0) - bmean
print("patients", sorted(set(pat)), "PD train ctrl", (ctrl_tr&(pat=="PD")).sum())
c = lambda a,b: np.corrcoef(a,b)[0,1]
rows=[]
for cond in sorted(set(pp.obs.perturbation.astype(str))):
    pert, dose = cond.split("@")
    meas = Xre[lab_re==f"{pert}@{float(dose)}"].mean(0) - ref
    pred = Xp[pp.obs.perturbation.astype(str).to_numpy()==cond].mean(0) - bmean
    # the training patients' own effects
    eff = np.mean([Xtr[(lab_tr==f"{pert}@{float(dose)}")&(pat==p)].mean(0)-Xtr[ctrl_tr&(pat==p)].mean(0) for p in sorted(set(pat)) if p!="PD"],0)
    # what a model that maps PD to the average training patient's treated cell would predict
    regress = eff + shift
    rows.append((cond, c(pred,meas), c(eff,meas), c(pred,eff), c(pred,shift), c(pred,regress), np.linalg.norm(pred), np.linalg.norm(meas), np.linalg.norm(shift)))
print("cond  r(pred,meas) r(meanshift,meas) r(pred,meanshift) r(pred,patientshift) r(pred,meanshift+patientshift) |pred| |meas| |shift|")
for r in rows: print(r[0], " ".join(f"{v:.2f}" for v in r[1:]))
print("mean", " ".join(f"{v:.2f}" for v in np.mean([r[1:] for r in rows],0)))
# the prediction with its component along the patient shift removed
out=[]
for cond in sorted(set(pp.obs.perturbation.astype(str))):
    pert, dose = cond.split("@")
    meas = Xre[lab_re==f"{pert}@{float(dose)}"].mean(0) - ref
    pred = Xp[pp.obs.perturbation.astype(str).to_numpy()==cond].mean(0) - bmean
    u = shift - shift.mean(); p0 = pred - pred.mean()
    res = p0 - (p0 @ u) / (u @ u) * u
    out.append((c(pred, meas), c(res, meas)))
print("pred vs meas, residual vs meas:", np.round(np.mean(out, 0), 3))
